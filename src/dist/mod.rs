//! Distributed training foundation: collectives (CPU TCP ring, NCCL), the gRPC coordinator and
//! its worker client, and launcher helpers. docs/DIST_PLAN.md says how the trainer uses them: through
//! [`parallel::Parallel`] in a worker, and [`supervise::supervise`] in `ftrun --nproc N`'s launcher.

pub mod collectives;
pub mod coordinator;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod parallel;
pub mod supervise;
pub mod tcp_ring;
pub mod ulysses;
pub mod worker;

/// Generated gRPC code for proto/coordinator.proto.
pub mod proto {
    tonic::include_proto!("ftrun.coordinator");
}
