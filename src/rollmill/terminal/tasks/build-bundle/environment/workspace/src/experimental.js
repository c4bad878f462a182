// unused experiment
