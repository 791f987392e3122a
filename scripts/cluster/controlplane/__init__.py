"""A real Kubernetes control plane on this machine, built from Go modules and cached outside the
repository: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, one local node whose
pods run as local processes, plus kubectl, helm and (optionally) KWOK.

``python scripts/cluster/cli.py up|down|status|build`` (the Makefile's cluster-* targets) drives it;
``controlplane.handle`` is what the ``cluster`` tests use.
"""
