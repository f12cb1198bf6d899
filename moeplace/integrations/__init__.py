"""Glue that lets serving engines (vLLM, SGLang) run moeplace's decisions in-process.

Each module here imports its engine lazily and checks the installed version's interface before
touching it; the rest of moeplace never imports this package, and nothing here is imported by
``import moeplace``.
"""
