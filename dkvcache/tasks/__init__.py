"""Checkable tasks for the tiny trained checkpoints (the quality yardstick every cache strategy is measured on).

``dkvcache.tasks.arith``: running-sum arithmetic with written steps, GSM8K-style answers (``#### N``).
"""
