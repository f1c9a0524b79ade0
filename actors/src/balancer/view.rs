//! The balancer's state as one immutable snapshot: what the state actor has applied from the
//! store, published after every change. Decisions, heartbeats and reads take the current snapshot
//! without a message to any actor.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::flow::ModuleType;
use super::instance::Instance;
use super::limits::LimitSet;
use super::model::{BalancerSettings, Instructions, RateLimitSpec, ScalingRecord};
use super::route::RoutingTable;
use super::traffic::TrafficRecord;

/// A record and the revision that last wrote it (0: never written; the default applies).
#[derive(Clone, Debug, Default)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: i64,
}

/// The balancer's state at one revision of the store.
#[derive(Clone, Default)]
pub struct View {
    /// The store revision applied.
    pub revision: i64,
    /// False until the first load: answers would be empty rather than true.
    pub loaded: bool,
    pub routes: Versioned<Arc<RoutingTable>>,
    pub limits: Versioned<Vec<RateLimitSpec>>,
    pub limiters: Arc<LimitSet>,
    pub instances: BTreeMap<String, Instance>,
    pub instructions: BTreeMap<String, Versioned<Instructions>>,
    pub traffic: BTreeMap<ModuleType, Versioned<TrafficRecord>>,
    pub scaling: BTreeMap<ModuleType, Versioned<ScalingRecord>>,
    pub settings: Versioned<BalancerSettings>,
}

impl View {
    /// The instances of one type, in id order.
    pub fn of_type(&self, t: ModuleType) -> impl Iterator<Item = &Instance> {
        self.instances
            .values()
            .filter(move |i| i.record.module_type == t)
    }

    /// The traffic record of `t` (default: no preference).
    pub fn traffic_of(&self, t: ModuleType) -> Versioned<TrafficRecord> {
        self.traffic.get(&t).cloned().unwrap_or_default()
    }

    /// The scaling record of `t` (default settings: disabled).
    pub fn scaling_of(&self, t: ModuleType) -> Versioned<ScalingRecord> {
        self.scaling.get(&t).cloned().unwrap_or_default()
    }
}

/// Where the current [`View`] is published.
#[derive(Clone, Default)]
pub struct Published(Arc<RwLock<Arc<View>>>);

impl Published {
    /// The current snapshot.
    pub fn get(&self) -> Arc<View> {
        self.0.read().expect("view lock").clone()
    }

    /// Replaces the snapshot.
    pub fn set(&self, view: View) {
        *self.0.write().expect("view lock") = Arc::new(view);
    }
}
