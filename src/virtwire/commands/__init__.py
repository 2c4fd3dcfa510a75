"""The ``virtwire`` subcommands, one module each (``add_arguments`` + ``run``), plus the
tracing options they share (``trace_options``)."""
