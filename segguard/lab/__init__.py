"""The built-in lab: a KVM-like bridge topology in network namespaces.

``segguard.lab.topology`` has the data model and build/destroy;
``segguard.lab.netns`` the low-level namespace/link helpers it is made of.
"""

from segguard.lab.topology import DEFAULT_PREFIX, Host, Lab, LabTopology, build, destroy, lab, plan

__all__ = ["DEFAULT_PREFIX", "Host", "Lab", "LabTopology", "build", "destroy", "lab", "plan"]
