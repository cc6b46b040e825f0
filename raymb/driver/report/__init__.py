"""raymb.driver.report."""
