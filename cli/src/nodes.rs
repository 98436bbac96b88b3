//! `hotroll nodes`: the fleet as the coordinator knows it.

use std::collections::BTreeMap;

use hotroll_proto::v1 as pb;
use serde::Serialize;

use super::Output;
use super::client::{CoordinatorArgs, connect, status_error};

#[derive(Debug, Clone, clap::Args)]
pub struct NodesArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Serialize)]
struct NodeJson {
    name: String,
    labels: BTreeMap<String, String>,
    connected: bool,
    apps: BTreeMap<String, AppJson>,
}

#[derive(Debug, Serialize)]
struct AppJson {
    current: String,
    permanent: String,
    /// This node runs another version of the app than most nodes that have it (see [`drift`]).
    drift: bool,
    /// An OTP release node: its release handler's releases (`which_releases/0`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    releases: Vec<ReleaseJson>,
}

#[derive(Debug, Serialize)]
struct ReleaseJson {
    name: String,
    version: String,
    /// current, permanent, unpacked or old.
    status: String,
}

/// An app whose nodes do not all run the same current version.
#[derive(Debug)]
struct Drift {
    /// Nodes by the version they run.
    by_version: BTreeMap<String, Vec<String>>,
    /// The version most of them run (ties: the highest in string order).
    majority: String,
}

/// Version drift, by app: a fleet left on two versions (a node skipped, a rollout partially
/// rolled back) shows here instead of going unnoticed.
fn drift(nodes: &[pb::NodeInfo]) -> BTreeMap<String, Drift> {
    let mut by_app: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for node in nodes {
        for app in &node.apps {
            by_app
                .entry(app.app.clone())
                .or_default()
                .entry(app.current.clone())
                .or_default()
                .push(node.name.clone());
        }
    }
    by_app
        .into_iter()
        .filter(|(_, by_version)| by_version.len() > 1)
        .filter_map(|(app, by_version)| {
            let majority = by_version
                .iter()
                .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(a.0.cmp(b.0)))?
                .0
                .clone();
            Some((
                app,
                Drift {
                    by_version,
                    majority,
                },
            ))
        })
        .collect()
}

fn to_json(node: &pb::NodeInfo, drifting: &BTreeMap<String, Drift>) -> NodeJson {
    NodeJson {
        name: node.name.clone(),
        labels: node.labels.clone().into_iter().collect(),
        connected: node.connected,
        apps: node
            .apps
            .iter()
            .map(|a| {
                (
                    a.app.clone(),
                    AppJson {
                        current: a.current.clone(),
                        permanent: a.permanent.clone(),
                        drift: drifting
                            .get(&a.app)
                            .is_some_and(|d| d.majority != a.current),
                        releases: a
                            .releases
                            .iter()
                            .map(|r| ReleaseJson {
                                name: r.name.clone(),
                                version: r.version.clone(),
                                status: r.status.clone(),
                            })
                            .collect(),
                    },
                )
            })
            .collect(),
    }
}

pub async fn run(args: NodesArgs) -> anyhow::Result<u8> {
    list(args).await.map(|()| crate::exit::OK)
}

async fn list(args: NodesArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.coordinator).await?;
    let nodes = client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .nodes;
    let drifting = drift(&nodes);
    match args.output {
        Output::Json => {
            let json: Vec<NodeJson> = nodes.iter().map(|n| to_json(n, &drifting)).collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Output::Text => {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header(["NODE", "CONNECTED", "LABELS", "APPS (current/permanent)"]);
            for node in &nodes {
                let json = to_json(node, &drifting);
                let labels = json
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let apps = json
                    .apps
                    .iter()
                    .map(|(app, v)| {
                        let flag = if v.drift { " (drift)" } else { "" };
                        // OTP release nodes: every release the release handler knows.
                        let releases = if v.releases.is_empty() {
                            String::new()
                        } else {
                            let listed: Vec<String> = v
                                .releases
                                .iter()
                                .map(|r| format!("{} {}", r.version, r.status))
                                .collect();
                            format!(" [releases: {}]", listed.join(", "))
                        };
                        format!("{app} {}/{}{flag}{releases}", v.current, v.permanent)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                table.add_row([
                    json.name,
                    if json.connected { "yes" } else { "no" }.to_string(),
                    labels,
                    apps,
                ]);
            }
            println!("{table}");
            for (app, drift) in &drifting {
                let spread: Vec<String> = drift
                    .by_version
                    .iter()
                    .map(|(version, nodes)| format!("{version} on {}", nodes.join(",")))
                    .collect();
                println!("version drift in {app}: {}", spread.join("; "));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, apps: &[(&str, &str)]) -> pb::NodeInfo {
        pb::NodeInfo {
            name: name.into(),
            apps: apps
                .iter()
                .map(|(app, current)| pb::AppState {
                    app: (*app).into(),
                    current: (*current).into(),
                    permanent: (*current).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_fleet_on_two_versions_is_flagged_per_node() {
        let nodes = [
            node("n1", &[("web", "2.0"), ("db", "9")]),
            node("n2", &[("web", "2.0"), ("db", "9")]),
            node("n3", &[("web", "1.0")]),
        ];
        let drifting = drift(&nodes);
        assert_eq!(drifting.len(), 1, "{drifting:?}");
        assert_eq!(drifting["web"].by_version["1.0"], ["n3"]);
        assert_eq!(drifting["web"].by_version["2.0"], ["n1", "n2"]);
        assert_eq!(drifting["web"].majority, "2.0");
        let flags: Vec<bool> = nodes
            .iter()
            .map(|n| to_json(n, &drifting).apps["web"].drift)
            .collect();
        assert_eq!(flags, [false, false, true]);
        assert!(!to_json(&nodes[0], &drifting).apps["db"].drift);
        assert!(drift(&nodes[..2]).is_empty());
    }
}
