"""Predictive maintenance: remaining useful life (RUL) of turbofan engines from sensor histories."""
