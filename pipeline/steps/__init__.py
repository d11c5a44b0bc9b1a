"""One module per pipeline step: its input/result types and its function."""
