"""The service: config, the supervisor, the control protocol, trainerctl, the dashboard."""
