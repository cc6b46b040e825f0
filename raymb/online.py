"""`raymb.online.follow`, kept where it was: online training is raymb.driver.run.follow."""

from raymb.driver.run import follow

__all__ = ["follow"]
