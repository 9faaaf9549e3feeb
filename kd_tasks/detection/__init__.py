"""MMDetection 3.x / MMEngine adapter (hooks, distiller model, configs). Not built yet: see the README."""
