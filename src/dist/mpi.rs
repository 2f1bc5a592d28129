//! The MPI backend of [`super::Collective`] (the `mpi` feature: rsmpi over the system's Open MPI). MPI's default
//! error handler is fatal, so a failed call (a rank that died, a broken connection) ends every rank: `mpirun` then
//! names the rank that failed.
use super::Collective;
use crate::{Error, Result};
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::traits::CommunicatorCollectives;

/// MPI_COMM_WORLD.
pub struct Mpi {
    world: SimpleCommunicator,
}

// SAFETY: MPI is initialised with MPI_THREAD_FUNNELED, and only the main thread calls it: the training loops make
// every collective call from the thread that runs `main` (rayon's workers compute, never communicate).
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI; the universe finalises it when dropped.
    pub fn init() -> Result<(::mpi::environment::Universe, Mpi)> {
        let (universe, _) = ::mpi::initialize_with_threading(::mpi::Threading::Funneled)
            .ok_or_else(|| Error::Msg("MPI was already initialised".into()))?;
        let world = universe.world();
        Ok((universe, Mpi { world }))
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_gather(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.world.all_gather_into(send, recv);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
