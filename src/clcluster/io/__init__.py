"""File I/O: STAR (via starfile), MRC stacks (via mrcfile), atomic writes."""
