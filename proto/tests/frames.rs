//! The coordinator's frames server (`hotroll_proto::frames`, defined by hand in `build.rs`)
//! must serve exactly the `Agent` service of `hotroll.proto`: same service name, same methods.
//! A method added to the proto and not to `build.rs` fails here, not in production.

use std::collections::BTreeSet;

fn agent_rpcs_in_proto() -> BTreeSet<String> {
    let proto = include_str!("../hotroll.proto");
    let start = proto
        .find("service Agent {")
        .unwrap_or_else(|| panic!("no `service Agent` in hotroll.proto"));
    let body = &proto[start..];
    let end = body
        .find("\n}")
        .unwrap_or_else(|| panic!("`service Agent` does not end"));
    body[..end]
        .lines()
        .filter_map(|line| line.trim().strip_prefix("rpc "))
        .map(|rest| {
            rest.split('(')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

fn routes_in_build_rs() -> BTreeSet<String> {
    include_str!("../build.rs")
        .split(".route_name(\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_frames_server_serves_the_agent_service_of_the_proto() {
    let rpcs = agent_rpcs_in_proto();
    assert!(rpcs.contains("Session"), "{rpcs:?}");
    assert_eq!(routes_in_build_rs(), rpcs);
    assert_eq!(
        hotroll_proto::frames::agent_server::SERVICE_NAME,
        hotroll_proto::v1::agent_server::SERVICE_NAME
    );
}
