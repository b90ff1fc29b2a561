//! Prints the NodeIPPool CRD: `cargo run -p vnet-kube --bin crdgen > deploy/crds/nodeippool.yaml`.

fn main() {
    print!("{}", vnet_kube::crd_yaml());
}
