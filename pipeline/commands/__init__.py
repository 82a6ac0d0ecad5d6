"""One module per command family: each builds its parser (``add_*_parser``) and runs it (``*_command``)."""
