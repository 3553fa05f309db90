#!/bin/sh
# install.sh — install the clinic-edge appliance: sudo ./install.sh [FLAGS] (./install.sh --help lists them).
# The installer itself is installer/install.sh; this file only starts it, so the command stays the same when the
# folder is copied to media that cannot hold symbolic links (a FAT-formatted USB disk).
main() { exec sh "$(dirname "$0")/installer/install.sh" "$@"; }
main "$@"
