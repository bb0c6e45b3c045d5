module recsys/userassign

go 1.22
