"""The ``diffca-med`` command line: argument parsing and messages only."""
