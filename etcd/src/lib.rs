//! The coordinator's high-availability store on etcd (docs/design.md §12).
//!
//! * [`client`]: a small client of etcd's v3 API (KV, Lease, Election, Maintenance.Status) that
//!   fails over between the cluster's members and bounds every request in time;
//! * [`leadership`]: campaigning on etcd's election with a kept-alive lease; the leader key's
//!   creation revision is the coordinator's **epoch**;
//! * [`store`]: [`store::EtcdStore`], the rollouts' `Store` in etcd, where every write is a
//!   transaction that compares the leader key's creation revision with the epoch, so a deposed
//!   leader's write fails.
//!
//! etcd's wire types (prost) stay in the private `wire` module.

pub mod client;
pub mod leadership;
pub mod store;

pub use client::{Condition, EtcdClient, EtcdError, EtcdOptions, KeyValue, Op};
pub use leadership::{Leadership, LeadershipLost};
pub use store::EtcdStore;

#[allow(clippy::all, clippy::pedantic, missing_docs, dead_code)]
mod wire {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}
