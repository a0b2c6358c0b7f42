"""HTML reports (:mod:`diffca_med.reports.html`) and their Jinja2 templates."""
