"""Multi-step jobs (prepare, demo, benchmark) composed from the data, model and analysis rooms."""
