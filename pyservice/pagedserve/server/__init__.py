"""The gRPC service: AsyncEngine (the step loop on its own thread), the TextGeneration
servicer, interceptors and the server application. Start it with `pagedserve serve`."""
