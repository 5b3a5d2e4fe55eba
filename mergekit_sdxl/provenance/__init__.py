"""Provenance: recipes read back from merged files (A1111, SuperMerger, ours), lineage and verification."""
