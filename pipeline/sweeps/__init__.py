"""The paper's ablations as Ray Tune sweeps: ``grids`` (the named grids, ``--grid``, their
trials), ``tune`` (Ray Tune trials running the sub-DAG, one MLflow run per sweep and trial),
``table`` (the sweep table: mean +- std per point, the paper beside)."""
