"""Simulation science below the simulate step: the realistic particle-set simulator
(continuous views, junk picks, coloured noise, off-centre picks)."""
