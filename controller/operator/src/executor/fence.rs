//! Fencing a dead node the Kubernetes way: the `node.kubernetes.io/out-of-service` taint
//! (`NoExecute`), the signal for non-graceful node shutdown: the pod garbage collector may then
//! force-delete its pods, and a kubelet that comes back evicts them instead of resuming. When
//! the node counts as dead is the driver's rule ([`automigrate_core::driver::fence`]).

use automigrate_core::driver::Outcome;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::OUT_OF_SERVICE_TAINT;
use super::pods::write_failure;
use super::port::OperatorPort;

impl OperatorPort<'_> {
    /// Adds the out-of-service taint to `node`. Only our taint is added, from a fresh read of
    /// the node with a resourceVersion precondition ([`crate::writer::Writer::add_node_taint`]),
    /// never by writing back the cached list: taints set meanwhile by others (the node
    /// lifecycle controller's `unreachable`) survive.
    pub(super) async fn mark_out_of_service(
        &self,
        node: &str,
        reason: &str,
        now: Timestamp,
    ) -> Outcome {
        let Some(node_object) = self.executor.stores.node(node) else {
            return Outcome::waiting(format!("node {node} is not in the node list"));
        };
        let taint = Taint {
            key: OUT_OF_SERVICE_TAINT.into(),
            value: Some("nodeshutdown".into()),
            effect: "NoExecute".into(),
            time_added: Some(Time(now)),
        };
        if let Err(error) = self.executor.writer.add_node_taint(node, taint).await {
            return write_failure(&error);
        }
        self.executor
            .writer
            .event(
                node_object.object_ref(&()),
                EventType::Warning,
                "OutOfService",
                format!(
                    "{reason}: tainted {OUT_OF_SERVICE_TAINT} to fence pods before migration {}",
                    self.current.name_any()
                ),
                "Fence",
            )
            .await;
        Outcome::done()
    }
}
