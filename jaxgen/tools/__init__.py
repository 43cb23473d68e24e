"""Tools around the library: the config catalog, sampling a run, sweeps and launches."""
