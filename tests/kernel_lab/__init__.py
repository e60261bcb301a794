"""Kernel lab: runs the ``kernel_lab``-marked tests inside a Debian kernel under qemu.

Entry point: ``python -m tests.kernel_lab.runner [pytest args...]`` (see README.md).
"""
