"""A run folder and what reads it: its files and lock (``files``), resuming (``resume``), a run in this process
(``in_process``), and its epoch lines read back (``reading``) as tables (``tables``) and pictures (``plots``)."""
