"""Evaluation: metrics, benchmark adapters, judge, reports."""
