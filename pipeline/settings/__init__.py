"""How a command's settings are resolved: YAML recipes (``config``, ``recipe``), flags made from the settings'
declarations (``setting_flags``), flag groups several commands share (``shared_flags``), and a distill command line
resolved into one ``DistillJob`` (``distill_job``)."""
