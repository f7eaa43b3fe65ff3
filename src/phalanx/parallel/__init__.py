"""Parallel engine: process groups (env), launch (elastic), model wrapping (DDP), metric collectives."""
