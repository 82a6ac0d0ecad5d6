"""The command line over the library: one parser in ``cli``, and its rooms: ``commands`` (one module per command
family), ``settings`` (recipes and flags resolved into a job), ``runs`` (a run folder and what reads it), ``cluster``
(Ray: joining, extraction, preparation, Ray Train) and ``sweeps`` (a sweep file, Ray Tune, the summary). Only this
package imports Ray."""
