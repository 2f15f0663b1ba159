//! The three-node RabbitMQ cluster of `ops/cluster`, for the tests that need one: started on
//! demand, and stopped with its data deleted when dropped, also when the test fails.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "cluster: {line}");
}

/// The cluster of `ops/cluster`, stopped and wiped when dropped.
pub struct Cluster {
    script: PathBuf,
    /// The AMQP port of each node, node 1 first.
    pub ports: Vec<u16>,
    /// The nodes' URLs as a TOML list, for `PUSHFLEET__RABBITMQ__URLS`.
    pub urls: String,
}

impl Cluster {
    pub fn start() -> Cluster {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ops/cluster");
        let started = Instant::now();
        let status = Command::new(&script)
            .arg("start")
            .stdout(Stdio::null())
            .status()
            .expect("ops/cluster runs");
        // From here on the nodes are ours to stop, whatever happens.
        let mut cluster = Cluster {
            script,
            ports: Vec::new(),
            urls: String::new(),
        };
        assert!(status.success(), "ops/cluster start failed");
        report(&format!(
            "3-node cluster started in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        let output = Command::new(&cluster.script).arg("urls").output().unwrap();
        cluster.urls = String::from_utf8(output.stdout).unwrap().trim().to_string();
        cluster.ports = cluster
            .urls
            .split('"')
            .filter(|part| part.starts_with("amqp://"))
            .map(|url| {
                let port = url.rsplit(':').next().unwrap();
                port.split('/').next().unwrap().parse().unwrap()
            })
            .collect();
        assert_eq!(cluster.ports.len(), 3, "{}", cluster.urls);
        cluster
    }

    /// `rabbitmqctl` against node `node` (1-based); its output.
    pub fn ctl(&self, node: usize, args: &[&str]) -> String {
        let output = Command::new(&self.script)
            .arg("ctl")
            .arg(node.to_string())
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("ops/cluster runs");
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?} on node {node}"
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// The node (1-based) each connection is on, by the name the client gave it, asked from node
    /// `via`.
    pub fn connections(&self, via: usize) -> HashMap<String, usize> {
        let args = [
            "list_connections",
            "--formatter",
            "json",
            "port",
            "client_properties",
        ];
        let listed: Vec<Value> = serde_json::from_str(&self.ctl(via, &args)).unwrap();
        listed
            .iter()
            .filter_map(|connection| {
                let port = connection["port"].as_u64()?;
                let node = self.ports.iter().position(|&p| u64::from(p) == port)? + 1;
                // [[key, type, value], ...]
                let name = connection["client_properties"]
                    .as_array()?
                    .iter()
                    .find(|property| property[0] == "connection_name")?[2]
                    .as_str()?;
                Some((name.to_string(), node))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("stop")
            .stdout(Stdio::null())
            .status();
    }
}

impl Cluster {
    /// The node (1-based) the connection named `name` is on.
    pub fn node_of(&self, name: &str) -> usize {
        let connections = (1..=self.ports.len())
            .map(|via| self.connections(via))
            .find(|c| !c.is_empty())
            .unwrap_or_default();
        *connections
            .get(name)
            .unwrap_or_else(|| panic!("no connection {name}: {connections:?}"))
    }
}
