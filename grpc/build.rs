//! Generates the gRPC code from `proto/` with a vendored `protoc`, so a machine with only the Rust
//! toolchain builds Lodge.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of intent: build scripts are single-threaded; prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let protos = [
        "lodge/admin/v1/admin.proto",
        "lodge/balancer/v1/balancer.proto",
        "lodge/cluster/v1/cluster.proto",
        "lodge/kv/v1/kv.proto",
        "lodge/raft/v1/raft.proto",
        "lodge/registry/v1/registry.proto",
        "lodge/router/v1/router.proto",
        "lodge/workflow/v1/workflow.proto",
    ];
    tonic_prost_build::configure()
        // Tunnel payload stays a view of the receive buffer from decode to the next encode.
        .bytes(".lodge.router.v1.Frame.data")
        .file_descriptor_set_path(out.join("lodge_descriptor.bin"))
        .compile_protos(&protos.map(|p| root.join(p)), std::slice::from_ref(&root))?;
    // etcd's KV, for `lodge bench kv` only: client code, and kept out of the descriptor set above
    // so that reflection never advertises a service the node does not serve.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(
            &[root.join("bench/etcd_kv.proto")],
            std::slice::from_ref(&root),
        )?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
