"""The report written after every run (not a cached node: rebuilt from the workdir in seconds):
``build`` gathers what the workdir holds, ``tables`` puts each paper table beside its measured
twin, ``claims`` judges the paper's claims, ``render`` writes Markdown and HTML, ``figures``
draws the report's own figure, ``paper`` holds the paper's numbers and settings."""
