//! Placeholder: the Kubernetes integration is being written.
