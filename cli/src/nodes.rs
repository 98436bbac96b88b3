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
}

fn to_json(node: &pb::NodeInfo) -> NodeJson {
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
    match args.output {
        Output::Json => {
            let json: Vec<NodeJson> = nodes.iter().map(to_json).collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Output::Text => {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header(["NODE", "CONNECTED", "LABELS", "APPS (current/permanent)"]);
            for node in &nodes {
                let json = to_json(node);
                let labels = json
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let apps = json
                    .apps
                    .iter()
                    .map(|(app, v)| format!("{app} {}/{}", v.current, v.permanent))
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
        }
    }
    Ok(())
}
