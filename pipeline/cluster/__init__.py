"""Ray at the edge: joining a cluster or starting a local one (``ray_env``), extraction actors (``extract``),
preparation actors (``prepare``) and Ray Train workers (``train``)."""
