"""A real local Kubernetes control plane (etcd, apiserver, controllers, scheduler, kwok) for tests
and demos."""
