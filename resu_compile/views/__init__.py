"""Views of a run for people and other programs: the report, the telemetry tables, the export.
They read the state and the history, never the controller."""
