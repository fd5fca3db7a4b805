//! Network faults with real packets, inside a [`Cluster`]'s nodes.

use std::time::Duration;

use super::Cluster;

/// How a node's link was impaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impairment {
    /// tc netem: loss and delay in the kernel's queue.
    Netem,
    /// The kernel has no netem: nftables drops packets at random and a tbf
    /// queue limits the rate, which delays what waits in it.
    NftablesAndTbf,
}

impl Cluster {
    /// Drops every packet between `node` and `peer`, both ways, with an
    /// nftables table in `node`. TCP on either side sees silence, not a
    /// reset: exactly a partition. [`Cluster::heal`] removes it.
    pub fn partition(&self, node: &str, peer: &str) {
        let peer = self.node(peer).addr.to_string();
        let table = "inet cryo_partition";
        assert!(
            self.nft(node, &["add", "table", "inet", "cryo_partition"]),
            "nft add table in {node}"
        );
        for (chain, hook, field) in [("in", "input", "saddr"), ("out", "output", "daddr")] {
            let spec = format!("{{ type filter hook {hook} priority 0; policy accept; }}");
            assert!(
                self.nft(
                    node,
                    &["add", "chain", "inet", "cryo_partition", chain, &spec]
                ),
                "nft add chain {chain} in {node}"
            );
            assert!(
                self.nft(
                    node,
                    &[
                        "add",
                        "rule",
                        "inet",
                        "cryo_partition",
                        chain,
                        "ip",
                        field,
                        &peer,
                        "drop"
                    ]
                ),
                "nft add rule {table} {chain} in {node}"
            );
        }
    }

    /// Ends a [`Cluster::partition`] of `node`.
    pub fn heal(&self, node: &str) {
        self.nft(node, &["delete", "table", "inet", "cryo_partition"]);
    }

    /// Loses `loss_percent` of the packets `node` sends and delays them by
    /// about `delay`, until [`Cluster::unimpair`]. Uses netem when the
    /// kernel has it, else nftables' random drop and a tbf rate limit
    /// sized so that a full queue waits about `delay`.
    pub fn impair(&self, node: &str, loss_percent: u32, delay: Duration) -> Impairment {
        let delay_ms = format!("{}ms", delay.as_millis().max(1));
        let loss = format!("{loss_percent}%");
        if self.tc(
            node,
            &[
                "qdisc", "add", "dev", "eth0", "root", "netem", "loss", &loss, "delay", &delay_ms,
            ],
        ) {
            return Impairment::Netem;
        }
        assert!(
            self.tc(
                node,
                &[
                    "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "20mbit", "burst",
                    "16kb", "latency", &delay_ms,
                ],
            ),
            "neither netem nor tbf could be added in {node}"
        );
        let spec = "{ type filter hook output priority 0; policy accept; }";
        let below = loss_percent.to_string();
        assert!(
            self.nft(node, &["add", "table", "inet", "cryo_loss"])
                && self.nft(node, &["add", "chain", "inet", "cryo_loss", "out", spec])
                && self.nft(
                    node,
                    &[
                        "add",
                        "rule",
                        "inet",
                        "cryo_loss",
                        "out",
                        "oifname",
                        "eth0",
                        "numgen",
                        "random",
                        "mod",
                        "100",
                        "<",
                        &below,
                        "drop",
                    ]
                ),
            "nft random drop in {node}"
        );
        Impairment::NftablesAndTbf
    }

    /// Ends a [`Cluster::impair`] of `node`.
    pub fn unimpair(&self, node: &str) {
        self.tc(node, &["qdisc", "del", "dev", "eth0", "root"]);
        self.nft(node, &["delete", "table", "inet", "cryo_loss"]);
    }
}
