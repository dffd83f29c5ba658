//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so no system `protoc` is needed,
//! and keeps the file descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/oidckms/v1/key_service.proto"];
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("oidckms_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::StrictCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    // The Kubernetes external JWT signer, compiled apart: it is served on its own Unix socket, so
    // its services stay out of the TCP server's reflection descriptors.
    let k8s_protos = [
        "proto/k8s/v1alpha1/externaljwt.proto",
        "proto/k8s/v1/externaljwt.proto",
    ];
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::StrictCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(protox::compile(k8s_protos, ["proto"])?)?;
    for p in protos.iter().chain(&k8s_protos) {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
