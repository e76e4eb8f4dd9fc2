//! The home node cut off from the API server but alive: the link between the node and the
//! control plane is cut ([`crate::kube::KubeCluster::cut_from_api`]); the node, its kubelet, its
//! agent and its workload run on, and its peers still reach it. Its kubelet can no longer renew
//! the node's Lease, so to the controller it looks like a dead node.
//!
//! This is the split brain issue 16 closes. Each run uses one of the controller's fencing modes
//! (`--dead-node-fencing`): with `taint` the controller treats the expired Lease as proof that
//! nothing runs there and starts a replacement while the original still trains (a second copy);
//! with `administrator` it waits for a person to confirm (the migration waits, training goes on
//! where it was). The suite reports these runs on their own line and never counts them as
//! passing.

use super::world::{FaultContext, HOME_NODE};
use super::{Draw, FaultParams, FaultPlan, Fencing, Trigger};

pub fn draw(_draw: &mut Draw, fencing: Fencing) -> (Trigger, FaultParams) {
    (Trigger::TheFault, FaultParams::ApiCut { fencing })
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::ApiCut { fencing } = plan.params else {
        return Err("not an api-cut plan".into());
    };
    let epoch = context.wait_for_percent(plan.percent, true).await?;
    context.cut_from_api(HOME_NODE)?;
    context.strike(HOME_NODE, None);
    context.note(format!(
        "{HOME_NODE} cut off from the API server at epoch {epoch} (alive: its kubelet, agent and \
         workload run on; peers reach it); the controller fences dead nodes by `{}`",
        fencing.name()
    ));
    Ok(())
}
