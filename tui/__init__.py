"""The technician's terminal dashboard (``clinic-edge dashboard``), built with Textual."""
