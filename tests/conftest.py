"""Hypothesis runs without time limits: these tests check behaviour, not speed (speed goals
live in bench/), and CI runs them beside other jobs on a shared 2-core machine, where a
slow example or slow data generation says nothing about the code under test."""

from hypothesis import HealthCheck, settings

settings.register_profile("fastrec", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fastrec")
