"""One module per ``clinic-edge`` subcommand: argument parsing and output only; the work lives elsewhere."""
