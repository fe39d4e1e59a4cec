"""Explanations for PLM-ICD / PLM-CA: attribution methods (`methods`), explanation-aware losses
and evaluation (docs/EXPLAIN.md)."""
