//! The MPI backend of [`super::Collective`] (the `mpi` feature: rsmpi over the system's Open MPI). MPI's default
//! error handler is fatal, so a failed call (a rank that died, a broken connection) ends every rank: `mpirun` then
//! names the rank that failed.
use super::Collective;
use crate::{Error, Result};
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::traits::CommunicatorCollectives;

/// MPI_COMM_WORLD, with its rank and size read once (they are asked for from any thread).
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// The thread that initialised MPI: the only one allowed to call it (MPI_THREAD_FUNNELED).
    main: std::thread::ThreadId,
}

// SAFETY: MPI is initialised with MPI_THREAD_FUNNELED, and only the main thread calls it: the training loops make
// every collective call from the thread that runs `main` (rayon's workers compute, never communicate).
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI; the universe finalises it when dropped.
    pub fn init() -> Result<(::mpi::environment::Universe, Mpi)> {
        let (universe, level) = ::mpi::initialize_with_threading(::mpi::Threading::Funneled)
            .ok_or_else(|| Error::Msg("MPI was already initialised".into()))?;
        if level < ::mpi::Threading::Funneled {
            return Err(Error::Msg(format!("the MPI library offers threading level {level:?}, qtune needs Funneled")));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok((universe, Mpi { world, rank, size, main: std::thread::current().id() }))
    }

    fn on_main_thread(&self) {
        assert_eq!(std::thread::current().id(), self.main, "MPI called from a thread other than main's");
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.on_main_thread();
        self.world.all_gather_into(send, recv);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.on_main_thread();
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
