"""What a finished run shows: text tables (and `mcscale compare`), figures and an offline report.html."""
