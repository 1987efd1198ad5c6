"""The one way kdcache reaches dask.distributed (stage 2 with --workers/--scheduler, grids)."""
import contextlib

from kdcache.errors import UserError


@contextlib.contextmanager
def dask_client(address: str | None = None, workers: int | None = None):
    """A Client of the running cluster at `address` (its workers must see the same files), or of a new
    LocalCluster of `workers` single-thread processes, closed on exit."""
    from distributed import Client, LocalCluster
    if address:
        try:
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError, ValueError) as e:  # ValueError: not an address
            raise UserError(f"cannot connect to the dask scheduler at {address}: {e}") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client
